/// The block every appliance request carries: its API token and facts
/// about itself.
public struct ApplianceBlock: Codable, Sendable, Equatable {
    /// The appliance's API token, from `corral pool appliance add`.
    public var apitoken: String
    /// The agent's version.
    public var version: String?
    /// Whether the appliance can fetch images from arbitrary URLs.
    public var dynamicimages: Bool?
    public var latitude: Double?
    public var longitude: Double?

    public init(
        apitoken: String, version: String? = nil, dynamicimages: Bool? = nil, latitude: Double? = nil,
        longitude: Double? = nil
    ) {
        self.apitoken = apitoken
        self.version = version
        self.dynamicimages = dynamicimages
        self.latitude = latitude
        self.longitude = longitude
    }
}

/// `POST /api/v1/authorization/`: an appliance checks its token.
public struct AuthorizationRequest: Codable, Sendable, Equatable {
    public var appliance: ApplianceBlock
    public init(appliance: ApplianceBlock) { self.appliance = appliance }
}

/// What the pool tells an authorized appliance about itself.
public struct AuthorizationResult: Codable, Sendable, Equatable {
    /// The appliance's name in the pool.
    public var name: String
    /// The user who owns it.
    public var owner: String

    public init(name: String, owner: String) {
        self.name = name
        self.owner = owner
    }
}
