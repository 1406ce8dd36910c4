import ArgumentParser
import Crypto
import Foundation
import Hummingbird
import Logging
import PoolAPI
import PoolController

extension Corral {
    struct Pool: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run and administer the pool controller.",
            subcommands: [
                Serve.self, Init.self, Migrate.self, Copy.self, SigningKey.self, Users.self, Appliances.self, Flavors.self, Images.self, Wisps.self,
                Templates.self, Instances.self, Reservations.self,
            ]
        )
    }
}

/// The configuration file and database every `corral pool` command works on.
///
/// The file is `--config`, else `CORRAL_POOL_CONFIG`, else
/// `/etc/corral/pool.toml` when it exists (else the built-in defaults). The
/// database is `--database`, else `CORRAL_POOL_DATABASE`, else the file's
/// `database.path` or `database.url`, else `/var/lib/corral/pool.sqlite`.
struct PoolDatabaseOptions: ParsableArguments {
    @Option(help: "The pool's configuration file (TOML; see etc/corral/pool.toml).")
    var config: String?

    @Option(help: "The pool's database: a SQLite file, or a postgres://USER:PASSWORD@HOST:PORT/DATABASE URL (overrides the configuration file).")
    var database: String?

    /// The configuration with the database option applied; exits with a
    /// one-line error when the file is missing or wrong.
    func configuration() -> PoolConfiguration {
        let environment = ProcessInfo.processInfo.environment
        var configuration = PoolConfiguration()
        let path = config ?? environment["CORRAL_POOL_CONFIG"]
        do {
            if let path {
                guard FileManager.default.fileExists(atPath: path) else {
                    fail("no pool configuration file at \(path): write one (see etc/corral/pool.toml), or leave out --config.")
                }
                configuration = try PoolConfiguration.load(path: path)
            } else if FileManager.default.fileExists(atPath: "/etc/corral/pool.toml") {
                configuration = try PoolConfiguration.load(path: "/etc/corral/pool.toml")
            }
        } catch let error as PoolError {
            fail("\(error)")
        } catch {
            fail("cannot read the pool configuration: \(error)")
        }
        if let database = database ?? environment["CORRAL_POOL_DATABASE"] {
            if PostgresLocation.isURL(database) {
                do { _ = try PostgresLocation(url: database, field: "--database") } catch { fail("\(error)") }
            }
            configuration.database = database
        }
        return configuration
    }

    /// Opens the database, which must exist (admin commands never create
    /// a SQLite file by accident, for example under a mistyped path).
    func openExisting() async throws -> any PoolStore {
        let configuration = configuration()
        let path = configuration.database
        guard PostgresLocation.isURL(path) || FileManager.default.fileExists(atPath: path) else {
            fail("no pool database at \(path): create it with `corral pool init --database \(path)`, or pass --database.")
        }
        return try await open(configuration)
    }

    /// Opens the database (creating a SQLite file when missing), migrated
    /// to this build's schema.
    func open(_ configuration: PoolConfiguration, logger: Logger = PoolDatabaseOptions.quietLogger) async throws -> any PoolStore {
        do {
            return try await openPoolStore(configuration, logger: logger)
        } catch let error as PoolError {
            fail("\(error)")
        }
    }

    /// Admin commands print only the database's errors.
    static let quietLogger: Logger = {
        var logger = Logger(label: "corral.pool")
        logger.logLevel = .error
        return logger
    }()

    /// Where the database is, without a password.
    static func describe(_ database: String) -> String {
        (try? PostgresLocation(url: database).redacted) ?? database
    }
}

/// Runs an admin operation, turning the pool's errors into one line and exit 1.
func administer<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as PoolError {
        fail("\(error)")
    }
}

extension Corral.Pool {
    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run the pool's HTTP server until SIGTERM or SIGINT.")

        @OptionGroup var store: PoolDatabaseOptions

        @Option(help: "The address to listen on (overrides the configuration file; default 127.0.0.1).")
        var host: String?

        @Option(help: "The port to listen on, 0 for any free port (overrides the configuration file; default 8080).")
        var port: Int?

        @Option(help: "The URL agents reach the pool at (overrides the configuration file).")
        var publicURL: String?

        @OptionGroup var log: LogOptions

        func validate() throws {
            if let port, !(0...65535).contains(port) { throw ValidationError("--port must be 0-65535 (it was \(port)).") }
            if let publicURL { try validateHTTPURL(publicURL, option: "--public-url") }
        }

        func run() async throws {
            var configuration = store.configuration()
            if let host { configuration.host = host }
            if let port { configuration.port = port }
            if let publicURL { configuration.publicURL = publicURL }
            let logger = log.logger("corral.pool")
            logger.info("pool database at \(PoolDatabaseOptions.describe(configuration.database))")
            let database = try await store.open(configuration, logger: logger)
            let scheme = configuration.tlsCertificate == nil ? "http" : "https"
            let app: any ApplicationProtocol
            do {
                app = try buildPoolApplication(
                    configuration: configuration, store: database, logger: logger
                ) { host, port in
                    // One line on standard output, so scripts can find the port.
                    FileHandle.standardOutput.write(Data("pool listening on \(scheme)://\(host):\(port)\n".utf8))
                }
            } catch let error as PoolError {
                fail("\(error)")
            }
            try await app.runService()
        }
    }

    struct Init: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the pool database (safe to repeat).")

        @OptionGroup var store: PoolDatabaseOptions

        func run() async throws {
            let configuration = store.configuration()
            _ = try await store.open(configuration)
            print("pool database ready at \(PoolDatabaseOptions.describe(configuration.database))")
        }
    }

    struct Copy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a SQLite pool database into an empty PostgreSQL database (to move a pool to PostgreSQL).",
            discussion: """
                Stop the pool first (`corral pool serve` writes the file). Every row comes along with its id: tokens, \
                the signing key agents pinned, instances, actions, reservations, timelines and keys. The PostgreSQL \
                database must hold no pool yet; the copy is one transaction, so a failure leaves it empty.
                """)

        @Option(help: "The SQLite pool database to copy from.") var from: String
        @Option(help: "The PostgreSQL database to copy into: postgres://USER:PASSWORD@HOST:PORT/DATABASE.") var to: String

        func validate() throws {
            guard PostgresLocation.isURL(to) else { throw ValidationError("--to must be a postgres:// URL (it was '\(to.prefix(100))').") }
            guard FileManager.default.fileExists(atPath: from) else { throw ValidationError("--from \(from): no such SQLite database.") }
        }

        func run() async throws {
            let copied = try await administer {
                let source = try SQLiteStore(path: from)
                let target = try await PostgresStore.open(url: to, logger: PoolDatabaseOptions.quietLogger)
                defer { target.close() }
                return try await target.copyRows(from: source)
            }
            for table in copied { print("\(table.table): \(table.rows) rows") }
            print("copied \(from) into \(PoolDatabaseOptions.describe(to)); point database.url at it and start the pool")
        }
    }

    struct Migrate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Bring the pool database to this build's schema and list its migrations (the pool also migrates when it starts).")

        @OptionGroup var store: PoolDatabaseOptions

        func run() async throws {
            let configuration = store.configuration()
            var logger = PoolDatabaseOptions.quietLogger
            logger.logLevel = .info
            let database = try await store.open(configuration, logger: logger)
            let applied = try await administer { try await database.appliedMigrations() }
            print("pool database at \(PoolDatabaseOptions.describe(configuration.database)) has migrations: \(applied.joined(separator: ", "))")
            if let problem = await database.readinessProblem() { fail(problem) }
        }
    }

    struct SigningKey: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "signing-key",
            abstract: "Print the public key (base64) that signs the pool's replies to appliances, for `corral agent register --pool-key`.")

        @OptionGroup var store: PoolDatabaseOptions

        func run() async throws {
            let key = try await administer { try await store.openExisting().signingKey() }
            print(try Curve25519.Signing.PrivateKey(rawRepresentation: key).publicKey.rawRepresentation.base64EncodedString())
        }
    }

    struct Users: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "user", abstract: "Manage the pool's users.",
            subcommands: [Add.self, List.self, Set.self, Disable.self, Enable.self, RotateToken.self])

        struct Disable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Refuse the user's token everywhere (401) until they are enabled again; open event streams end within 15 s.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The user's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setUser(name, enabled: false) }
                print("user '\(name)' disabled")
            }
        }

        struct Enable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Accept the user's token again.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The user's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setUser(name, enabled: true) }
                print("user '\(name)' enabled")
            }
        }

        struct RotateToken: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "rotate-token",
                abstract: "Give the user a new token (printed once); the old one is refused at once, its event streams within 15 s.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The user's name.") var name: String

            func run() async throws {
                let token = Token.generate()
                _ = try await administer { try await store.openExisting().setUserToken(name, tokenDigest: Token.digest(token)) }
                print(token)
            }
        }

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create a user and print their API token, once, alone on standard output.")

            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The user's name.") var name: String
            @Flag(help: "May see and manage every instance.") var superuser = false
            @Option(help: "How many instances the user may hold at once.") var maxInstances = 10
            @Option(help: "An existing user who manages this one: sees and changes their instances.") var manager: String?
            @Option(help: "How long the user's new instances are leased for (default: the pool's leases.default_seconds).")
            var leaseSeconds: Int?
            @Flag(help: "Print JSON.") var json = false

            func validate() throws {
                try validateName(name, field: "NAME")
                guard maxInstances >= 0 else {
                    throw ValidationError("--max-instances must be 0 or more (it was \(maxInstances)).")
                }
                if let leaseSeconds, !(60...31_536_000).contains(leaseSeconds) {
                    throw ValidationError("--lease-seconds must be from 60 to 31536000 (it was \(leaseSeconds)).")
                }
            }

            func run() async throws {
                let token = Token.generate()
                let user = try await administer {
                    try await store.openExisting().addUser(
                        name: name, superuser: superuser, maxInstances: maxInstances, tokenDigest: Token.digest(token),
                        manager: manager, leaseSeconds: leaseSeconds)
                }
                if json { return try printJSON(["name": user.name, "id": user.id, "token": token]) }
                print(token)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List users (never their tokens).")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let users = try await administer { try await store.openExisting().users() }
                if json { return try printJSON(users) }
                var table = Table(header: ["NAME", "ID", "SUPERUSER", "ENABLED", "MANAGER", "MAX INSTANCES", "LEASE", "CREATED"])
                for user in users {
                    table.rows.append([
                        user.name, user.id, user.superuser ? "yes" : "no", user.enabled ? "yes" : "no", user.manager ?? "-",
                        "\(user.maxInstances)",
                        user.leaseSeconds.map { "\($0) s" } ?? "default", user.createdAt.formatted(.iso8601),
                    ])
                }
                print(table.render())
            }
        }
    }

    struct Appliances: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "appliance", abstract: "Manage the appliances (agents) that may check in.",
            subcommands: [Add.self, List.self, Wait.self, Disable.self, Enable.self, Region.self, RotateToken.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create an appliance and print its API token, once, alone on standard output.")

            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String
            @Option(help: "The user who owns it.") var owner: String
            @Option(help: "The region it is in, for launches that ask for one.") var region: String?
            @Flag(help: "Print JSON.") var json = false

            func validate() throws {
                if let problem = ResourceName.problem(name) {
                    throw ValidationError("NAME \(problem) (\(ResourceName.pattern)); it was '\(name)'.")
                }
            }

            func run() async throws {
                let token = Token.generate()
                let appliance = try await administer {
                    let pool = try await store.openExisting()
                    _ = try await pool.addAppliance(name: name, owner: owner, tokenDigest: Token.digest(token))
                    return try await pool.setAppliance(name, region: region)
                }
                if json { return try printJSON(["name": appliance.name, "owner": appliance.owner, "token": token]) }
                print(token)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List appliances (never their tokens).")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let appliances = try await administer { try await store.openExisting().appliances() }
                if json { return try printJSON(appliances) }
                let staleAfter = store.configuration().housekeeping.applianceStaleSeconds
                var table = Table(header: ["NAME", "OWNER", "REGION", "STATUS", "VERSION", "FREE VCPUS", "FREE MEMORY", "LAST SEEN"])
                for appliance in appliances {
                    let status =
                        !appliance.enabled ? "disabled" : appliance.isStale(at: Date(), after: staleAfter) ? "stale" : "active"
                    table.rows.append([
                        appliance.name, appliance.owner, appliance.region ?? "-", status, appliance.version ?? "-",
                        appliance.stats.map { "\($0.vcpus.free)/\($0.vcpus.total)" } ?? "-",
                        appliance.stats.map { "\($0.memoryMiB.free)/\($0.memoryMiB.total) MiB" } ?? "-",
                        appliance.lastSeen?.formatted(.iso8601) ?? "never",
                    ])
                }
                print(table.render())
            }
        }

        struct Wait: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Wait until an appliance is enabled, fresh and has reported its capacity: from then on placement counts it.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String
            @Option(help: "Give up after this many seconds (1 to 86400).") var timeout = 120

            func validate() throws {
                guard (1...86_400).contains(timeout) else {
                    throw ValidationError("--timeout must be from 1 to 86400 seconds (it was \(timeout)).")
                }
            }

            func run() async throws {
                let staleAfter = store.configuration().housekeeping.applianceStaleSeconds
                let pool = try await store.openExisting()
                let deadline = ContinuousClock.now + .seconds(timeout)
                while true {
                    guard let appliance = try await administer({ try await pool.appliances() }).first(where: { $0.name == name }) else {
                        fail("there is no appliance '\(name)'; `corral pool appliance list` shows them")
                    }
                    guard appliance.enabled else { fail("appliance '\(name)' is disabled; `corral pool appliance enable \(name)`") }
                    if let stats = appliance.stats, !appliance.isStale(at: Date(), after: staleAfter) {
                        return print(
                            "appliance '\(name)' is checked in: \(stats.vcpus.free) vCPUs, \(stats.memoryMiB.free) MiB and \(stats.diskGiB.free) GiB free"
                        )
                    }
                    guard ContinuousClock.now < deadline else {
                        let seen = appliance.lastSeen.map { "last seen \($0.formatted(.iso8601))" } ?? "never seen"
                        fail("appliance '\(name)' has not checked in within \(timeout) s (\(seen)); see its agent's log and `corral agent status`")
                    }
                    try await Task.sleep(for: .milliseconds(250))
                }
            }
        }

        struct Region: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Set the region an appliance is in (none when REGION is left out).")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String
            @Argument(help: "The region.") var region: String?

            func run() async throws {
                let appliance = try await administer { try await store.openExisting().setAppliance(name, region: region) }
                print("appliance \(appliance.name) is in region \(appliance.region ?? "(none)")")
            }
        }

        struct Disable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Refuse the appliance's check-ins (409) until it is enabled again.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setAppliance(name, enabled: false) }
                print("appliance '\(name)' disabled")
            }
        }

        struct Enable: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Accept the appliance's check-ins again.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                _ = try await administer { try await store.openExisting().setAppliance(name, enabled: true) }
                print("appliance '\(name)' enabled")
            }
        }

        struct RotateToken: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "rotate-token",
                abstract: "Give the appliance a new token (printed once); the old one stops working at once.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The appliance's name.") var name: String

            func run() async throws {
                let token = Token.generate()
                try await administer {
                    try await store.openExisting().setApplianceToken(name, tokenDigest: Token.digest(token))
                }
                print(token)
            }
        }
    }

    struct Flavors: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "flavor", abstract: "Manage the flavor catalogue.", subcommands: [Add.self, List.self, Set.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a flavor (a size of instance).")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The flavor's name.") var name: String
            @Option(help: "Virtual CPUs.") var vcpus: Int
            @Option(help: "Memory in MiB.") var memoryMib: Int
            @Option(help: "Disk in GiB.") var diskGib: Int
            @Option(help: "Upload limit in Mbit/s (0: none).") var networkUp = 0
            @Option(help: "Download limit in Mbit/s (0: none).") var networkDown = 0
            @Option(help: "Asking price per hour.") var ask = 0
            @Option(help: "Pool's rate per hour.") var rate = 0
            @Option(help: "A line describing the flavor.") var description = ""

            func validate() throws {
                try validateName(name, field: "NAME")
                let limits = PoolConfiguration.Limits()
                guard (1...limits.maxVCPUs).contains(vcpus) else {
                    throw ValidationError("--vcpus must be from 1 to \(limits.maxVCPUs) (it was \(vcpus)).")
                }
                guard (16...limits.maxMemoryMiB).contains(memoryMib) else {
                    throw ValidationError("--memory-mib must be from 16 to \(limits.maxMemoryMiB) (it was \(memoryMib)).")
                }
                guard (1...limits.maxDiskGiB).contains(diskGib) else {
                    throw ValidationError("--disk-gib must be from 1 to \(limits.maxDiskGiB) (it was \(diskGib)).")
                }
                for (option, value) in [("--network-up", networkUp), ("--network-down", networkDown), ("--ask", ask), ("--rate", rate)]
                where value < 0 {
                    throw ValidationError("\(option) must be 0 or more (it was \(value)).")
                }
            }

            func run() async throws {
                let flavor = Flavor(
                    name: name, description: description, vcpus: vcpus, memory: memoryMib, disk: diskGib,
                    networkUp: networkUp, networkDown: networkDown, rate: rate, ask: ask)
                try await administer { try await store.openExisting().addFlavor(flavor) }
                print("flavor '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the flavor catalogue.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let flavors = try await administer { try await store.openExisting().flavors() }
                if json { return try printJSON(flavors) }
                var table = Table(header: ["NAME", "VCPUS", "MEMORY", "DISK", "ASK", "ACTIVE"])
                for flavor in flavors {
                    table.rows.append([
                        flavor.name, "\(flavor.vcpus)", "\(flavor.memory) MiB", "\(flavor.disk) GiB", "\(flavor.ask)",
                        flavor.active ? "yes" : "no",
                    ])
                }
                print(table.render())
            }
        }
    }
}

extension Corral.Pool {
    struct Images: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "image", abstract: "Manage the boot images.", subcommands: [Add.self, List.self, Set.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add an image that appliances download by URL.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The image's name.") var name: String
            @Option(help: "Where appliances download it (http or https).") var url: String
            @Option(help: "The file's SHA-256 in hex; appliances refuse a file that does not match.") var sha256: String?
            @Option(help: "qcow2 or raw.") var diskFormat = "qcow2"
            @Option(help: "For an image without a boot loader: the URL of the kernel to boot it with.") var kernelURL: String?
            @Option(help: "The kernel's SHA-256 in hex.") var kernelSha256: String?
            @Option(help: "The URL of the initrd to boot the kernel with.") var initrdURL: String?
            @Option(help: "The initrd's SHA-256 in hex.") var initrdSha256: String?
            @Option(help: "The kernel command line (with --kernel-url).") var cmdline = "root=/dev/vda console=ttyS0 rw no_timer_check"
            @Option(
                help: ArgumentHelp(
                    "The guest user cloud-init gives instances' SSH keys to (Debian's images: debian).",
                    discussion: "The API then names it as the user to log in as, and the keys of running guests follow their instance's users through the QEMU guest agent (the image needs qemu-guest-agent); warm instances are handed out only of images that name one."))
            var loginUser: String?

            func validate() throws {
                try validateName(name, field: "NAME")
                if let loginUser { try validateLoginUser(loginUser) }
                try validateHTTPURL(url, option: "--url")
                for (option, value) in [("--sha256", sha256), ("--kernel-sha256", kernelSha256), ("--initrd-sha256", initrdSha256)] {
                    if let value, value.count != 64 || !value.allSatisfy(\.isHexDigit) {
                        throw ValidationError("\(option) must be 64 hex digits (it was '\(value)').")
                    }
                }
                guard ["qcow2", "raw"].contains(diskFormat) else {
                    throw ValidationError("--disk-format must be qcow2 or raw (it was '\(diskFormat)').")
                }
                if let kernelURL { try validateHTTPURL(kernelURL, option: "--kernel-url") }
                if let initrdURL { try validateHTTPURL(initrdURL, option: "--initrd-url") }
                if kernelURL == nil, initrdURL != nil || kernelSha256 != nil || initrdSha256 != nil {
                    throw ValidationError("--initrd-url, --kernel-sha256 and --initrd-sha256 need --kernel-url.")
                }
                if initrdURL == nil, initrdSha256 != nil { throw ValidationError("--initrd-sha256 needs --initrd-url.") }
            }

            func run() async throws {
                let kernelBoot = kernelURL.map { kernel in
                    KernelBoot(
                        kernel: RemoteFile(url: kernel, sha256: kernelSha256?.lowercased()),
                        initrd: initrdURL.map { RemoteFile(url: $0, sha256: initrdSha256?.lowercased()) }, cmdline: cmdline)
                }
                let image = Image(
                    name: name, url: url, sha256: sha256?.lowercased(), diskFormat: diskFormat, kernelBoot: kernelBoot,
                    loginUser: loginUser)
                try await administer { try await store.openExisting().addImage(image) }
                print("image '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the images.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let images = try await administer { try await store.openExisting().images() }
                if json { return try printJSON(images) }
                var table = Table(header: ["NAME", "FORMAT", "SHA256", "URL"])
                for image in images {
                    table.rows.append([image.name, image.diskFormat, image.sha256.map { String($0.prefix(12)) } ?? "-", image.url])
                }
                print(table.render())
            }
        }
    }

    struct Wisps: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "wisp", abstract: "Manage wisps: the image, SSH keys and script an instance boots with.",
            subcommands: [Add.self, List.self, Set.self, Remove.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a wisp.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The wisp's name.") var name: String
            @Option(help: "The user who owns it.") var owner: String
            @Option(help: "A catalogue image to boot.") var image: String?
            @Option(help: "Or: an image URL the appliance downloads itself.") var dynamicImageURL: String?
            @Option(help: "A file of SSH public keys, one per line (repeatable).") var sshKeyFile: [String] = []
            @Option(help: "A post-creation script (#!...) or cloud-config (#cloud-config) file.") var postCreateFile: String?
            @Option(help: "A URL the appliance asks for its start parameters instead.") var callbackURL: String?
            @Flag(help: "Make it the owner's default wisp.") var `default` = false
            @Flag(help: "Make it the pool's fallback for users without a default.") var systemDefault = false

            func validate() throws {
                try validateName(name, field: "NAME")
                guard (image == nil) != (dynamicImageURL == nil) else {
                    throw ValidationError("give exactly one of --image NAME or --dynamic-image-url URL.")
                }
                if let dynamicImageURL { try validateHTTPURL(dynamicImageURL, option: "--dynamic-image-url") }
                if let callbackURL { try validateHTTPURL(callbackURL, option: "--callback-url") }
            }

            func run() async throws {
                let keys = sshKeyFile.flatMap(readKeyLines)
                let postCreate = postCreateFile.map { readText($0, option: "--post-create-file") } ?? ""
                let wisp = Wisp(
                    name: name, owner: owner, image: image, dynamicImageURL: dynamicImageURL, sshKeys: keys,
                    postCreate: postCreate, callbackURL: callbackURL, isDefault: self.default, isSystemDefault: systemDefault)
                try await administer { try await store.openExisting().addWisp(wisp) }
                print("wisp '\(name)' added")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the wisps.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let wisps = try await administer { try await store.openExisting().wisps() }
                if json { return try printJSON(wisps) }
                var table = Table(header: ["NAME", "OWNER", "IMAGE", "SSH KEYS", "DEFAULT"])
                for wisp in wisps {
                    let scope = wisp.isSystemDefault ? "system" : wisp.isDefault ? "owner" : "-"
                    table.rows.append([wisp.name, wisp.owner, wisp.image ?? wisp.dynamicImageURL ?? "-", "\(wisp.sshKeys.count)", scope])
                }
                print(table.render())
            }
        }
    }

    struct Templates: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "template",
            abstract: "Manage templates: a wisp and a flavor users launch by name, with a pool of warm instances.",
            subcommands: [Add.self, List.self, Set.self, Remove.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a template.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The template's name (as in POST /api/stream/NAME).") var name: String
            @Option(help: "The wisp its instances boot from; its owner owns the warm instances.") var wisp: String
            @Option(help: "The flavor its instances run with.") var flavor: String
            @Option(help: "How many booted instances to keep warm for it.") var hotStarts = 0

            func validate() throws {
                try validateName(name, field: "NAME")
                guard (0...Template.maxHotStarts).contains(hotStarts) else {
                    throw ValidationError("--hot-starts must be from 0 to \(Template.maxHotStarts) (it was \(hotStarts)).")
                }
            }

            func run() async throws {
                try await administer {
                    try await store.openExisting().addTemplate(Template(name: name, wisp: wisp, flavor: flavor, hotStarts: hotStarts))
                }
                print("template \(name) added: wisp \(wisp), flavor \(flavor), \(hotStarts) kept warm")
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the templates with their warm instances.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let (templates, instances) = try await administer {
                    let pool = try await store.openExisting()
                    return (try await pool.templates(), try await pool.instances())
                }
                if json { return try printJSON(templates) }
                var table = Table(header: ["NAME", "WISP", "FLAVOR", "HOT STARTS", "WARM", "READY"])
                for template in templates {
                    let warm = instances.filter { $0.warm && $0.template == template.name && $0.state != .decommissioned }
                    let ready = warm.filter { $0.state == .running && $0.lastError == nil }
                    table.rows.append([
                        template.name, template.wisp, template.flavor, "\(template.hotStarts)", "\(warm.count)", "\(ready.count)",
                    ])
                }
                print(table.render())
            }
        }
    }

    struct Instances: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "instance", abstract: "Inspect instances and send them actions through their appliance.",
            subcommands: [List.self, Act.self, Lease.self])

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the instances with their last report.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let instances = try await administer { try await store.openExisting().instances() }
                if json { return try printJSON(instances) }
                var table = Table(header: ["NAME", "APPLIANCE", "OWNER", "STATE", "ADDRESSES", "UPDATED", "ERROR"])
                for instance in instances {
                    table.rows.append([
                        instance.name, instance.appliance, instance.owner,
                        "\(instance.state.rawValue) \(instance.state)" + (instance.stateReason.map { ": \($0)" } ?? ""),
                        instance.ipAddresses.isEmpty ? "-" : instance.ipAddresses.map(\.address).joined(separator: ","),
                        instance.updatedAt.formatted(.iso8601), instance.lastError ?? "-",
                    ])
                }
                print(table.render())
            }
        }

        struct Act: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "action",
                abstract: "Queue reboot, power-on, power-off or delete for the instance's appliance; prints the action's id.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "reboot, power-on, power-off or delete.") var action: String
            @Argument(help: "The instance's name.") var name: String

            var kind: PoolAPI.Action.Kind? {
                ["reboot": .reboot, "power-on": .powerOn, "power-off": .powerOff, "delete": .delete][action]
            }

            func validate() throws {
                guard kind != nil else {
                    throw ValidationError("ACTION must be reboot, power-on, power-off or delete (it was '\(action)').")
                }
            }

            func run() async throws {
                let queued = try await administer {
                    try await store.openExisting().enqueueAction(kind!, instance: name, expires: nil, at: Date())
                }
                print(queued.id)
            }
        }

        struct Lease: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Set when the instance's lease ends; its appliance suspends it then. Prints the action's id.")
            @OptionGroup var store: PoolDatabaseOptions
            @Argument(help: "The instance's name.") var name: String
            @Option(help: "Seconds from now until the lease ends.") var seconds: Int

            func validate() throws {
                guard (1...315_360_000).contains(seconds) else {
                    throw ValidationError("--seconds must be from 1 to 315360000 (ten years; it was \(seconds)).")
                }
            }

            func run() async throws {
                let queued = try await administer {
                    try await store.openExisting().enqueueAction(
                        .lease, instance: name, expires: Date().addingTimeInterval(TimeInterval(seconds)), at: Date())
                }
                print(queued.id)
            }
        }
    }

    struct Reservations: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "reservation", abstract: "Inspect reservations (bids) users made.", subcommands: [List.self])

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List reservations not yet claimed or purged.")
            @OptionGroup var store: PoolDatabaseOptions
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let reservations = try await administer { try await store.openExisting().reservations() }
                if json { return try printJSON(reservations) }
                var table = Table(header: ["ID", "USER", "INSTANCE", "APPLIANCE", "WISP OR CALLBACK", "EXPIRES"])
                for reservation in reservations {
                    table.rows.append([
                        reservation.id, reservation.user, reservation.instance, reservation.appliance,
                        reservation.wisp ?? reservation.callbackURL ?? "(default wisp)",
                        Date(timeIntervalSince1970: TimeInterval(reservation.expires)).formatted(.iso8601),
                    ])
                }
                print(table.render())
            }
        }
    }
}

/// The non-blank lines of an `--ssh-key-file`.
func readKeyLines(_ file: String) -> [String] {
    readText(file, option: "--ssh-key-file").split(whereSeparator: \.isNewline).map(String.init)
        .filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
}

/// The text of a file an option names, or a failure naming the option.
func readText(_ file: String, option: String) -> String {
    guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { fail("cannot read \(option) \(file)") }
    return text
}

/// URLs the pool hands to appliances: http or https with a host.
func validateHTTPURL(_ text: String, option: String) throws {
    guard let url = URL(string: text), ["http", "https"].contains(url.scheme?.lowercased() ?? ""), url.host != nil else {
        throw ValidationError("\(option) must be an http or https URL (it was '\(text)').")
    }
}

/// Names of users, appliances and flavors: letters, digits, `.`, `_`, `-`.
func validateName(_ name: String, field: String) throws {
    let allowed = CharacterSet.alphanumerics.union(CharacterSet(charactersIn: "._-"))
    guard !name.isEmpty, name.count <= 64, name.unicodeScalars.allSatisfy({ $0.isASCII && allowed.contains($0) }) else {
        throw ValidationError("\(field) must be 1-64 ASCII letters, digits, '.', '_' or '-' (it was '\(name)').")
    }
    guard !(name.count == 32 && name.allSatisfy(\.isHexDigit)) else {
        throw ValidationError("\(field) must not be 32 hexadecimal digits, the form of ids (it was '\(name)').")
    }
}

/// A guest login user: what `useradd` accepts by default (a lowercase
/// letter or `_`, then up to 31 lowercase letters, digits, `_` or `-`).
func validateLoginUser(_ user: String) throws {
    guard LoginUserName.isValid(user) else {
        throw ValidationError("--login-user must be a user name such as debian: a lowercase letter or '_', then up to 31 lowercase letters, digits, '_' or '-' (it was '\(user)').")
    }
}
